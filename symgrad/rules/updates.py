"""Why an update rule's formulas are what they are: steps ``symgrad derive RULE --steps`` prints.

An update rule is not differentiated, so its derivation is the explanation of its forms. One is
derived here rather than asserted: a running average ``m <- beta*m + (1 - beta)*g`` that starts at
``m = 0`` holds, after t steps, ``m_t = sum over k of (1 - beta)*beta**(t - k)*g_k``; its weights
sum (SymPy evaluates the geometric sum) to ``1 - beta**t``, not 1, so ``m_t`` is biased toward 0
early on, and dividing by ``1 - beta**t`` makes the weights sum to 1: an unbiased average of g
when the gradients' mean does not change. Any rule dividing by ``1 - b**t`` (a param ``b`` to the
power of the scalar input ``t``) gets the step, Adam's two corrections and a user's alike.
"""
from __future__ import annotations

import functools

import sympy as sp

from ..rewrite import Step

STAGE = "explain update"
_BETA, _T = sp.Symbol("beta", real=True), sp.Symbol("t", integer=True, positive=True)


@functools.lru_cache(maxsize=None)
def _weights_total() -> sp.Expr:
    """SymPy's sum of the weights (1 - beta)*beta**(t - k), k = 1..t, as (1 - beta) times the
    geometric series over j = t - k (the branch beta != 1: a decay lies in [0, 1)); computed once."""
    j = sp.Symbol("j", integer=True)
    series = sp.summation(_BETA**j, (j, 0, _T - 1))
    if isinstance(series, sp.Piecewise):
        series = series.args[-1][0]
    return sp.cancel((1 - _BETA) * series)


def bias_corrections(expr: sp.Expr, params: set, steps: set) -> list[tuple[sp.Symbol, sp.Symbol]]:
    """``(beta, t)`` of every factor ``1 - beta**t`` in ``expr`` (also under a square root)."""
    found = []
    for node in sp.preorder_traversal(expr):
        if isinstance(node, sp.Add) and len(node.args) == 2 and sp.S.One in node.args:
            other = node.args[0] if node.args[1] == 1 else node.args[1]
            power = -other
            if isinstance(power, sp.Pow) and power.base in params and power.exp in steps:
                if (power.base, power.exp) not in found:
                    found.append((power.base, power.exp))
    return found


def explain(op, expr: sp.Expr) -> list[Step]:
    """The steps that justify ``expr``'s bias corrections (empty when it has none)."""
    params = {p.symbol for p in op.params}
    scalars = {sp.Symbol(t.name, real=True) for t in op.inputs if not t.dims}
    out = []
    before = expr  # each step follows the last, so --steps shows them all under the value they explain
    for beta, t in bias_corrections(expr, params, scalars):
        k = sp.Symbol("k", integer=True)
        weights = sp.Sum((1 - beta) * beta ** (t - k), (k, 1, t))
        total = _weights_total().xreplace({_BETA: beta, _T: t})
        if sp.expand(total - (1 - beta**t)) != 0:
            continue  # not the weights of a running average that starts at 0: nothing to justify
        out.append(Step(STAGE, "bias_correction",
                        f"a running average with decay {beta} starts at 0, so after {t} steps it weighs the gradients "
                        f"by (1 - {beta})*{beta}**({t} - k), k = 1..{t}, which sum to the right side (SymPy), not 1: "
                        f"dividing by 1 - {beta}**{t} makes them sum to 1 (an unbiased average)",
                        before, sp.Eq(weights, total, evaluate=False)))
        before = out[-1].after
    return out
