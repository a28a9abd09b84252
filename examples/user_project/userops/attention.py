"""Multi-head scaled-dot-product attention on ``[B, H, T, E]``, with an optional causal mask.

Written the way a person writes it, one intermediate a line:

    keep[t, s]        = [s <= t or causal == 0]                      (the causal mask, a bracket)
    score[b, h, t, s] = sum_e Q[b, h, t, e]*K[b, h, s, e]/sqrt(E)
    lse[b, h, t]      = log(sum_s keep[t, s]*exp(score[b, h, t, s]))  (the row's log-sum-exp)
    p[b, h, t, s]     = keep[t, s]*exp(score[b, h, t, s] - lse[b, h, t])   (masked entries 0)
    O[b, h, t, e]     = sum_s p[b, h, t, s]*V[b, h, s, e]

With ``causal = 1`` a key ``s`` after the query ``t`` is masked as
``F.scaled_dot_product_attention(is_causal=True)`` masks it. symgrad stabilizes ``lse`` with the
max over the keys the mask keeps, and derives ``dQ``, ``dK`` and ``dV`` over the saved ``p`` and
``O`` (``dS = p*(dO V^T - rowsum(dO*O))``), never over a raw ``exp(score)``: ``symgrad derive
attention`` shows them, ``symgrad check attention`` checks them in float32 at scores of +-100.
"""
import sympy as sp

from symgrad.declare import Dim, Op, Param, Tensor, idx, output, register
from symgrad.functions import Iverson

Bd, Hd, Td, Ed = Dim("B", "b"), Dim("H", "h"), Dim("T", "t"), Dim("E", "e")
b, h, t, s, e, u = idx("b h t s e u")
causal = Param("causal", 0, integer=True, doc="1: key s > query t is masked (is_causal=True)", domain="{0, 1}")
Q, K, V = (Tensor(n, (Bd, Hd, Td, Ed)) for n in "QKV")
score, lse, p = (sp.IndexedBase(n, real=True) for n in ("score", "lse", "p"))


def keep(query, key):
    """1 where the query may attend to the key: always, or (causal) up to itself."""
    return Iverson(sp.Or(key <= query, sp.Eq(causal.symbol, 0)))


attention = register(Op(
    name="attention",
    doc="softmax(Q K^T/sqrt(E) + causal mask) V per batch and head, as F.scaled_dot_product_attention",
    inputs=(Q, K, V),
    params=(causal,),
    intermediates=(
        output("score", (b, h, t, s), sp.Sum(Q[b, h, t, e] * K[b, h, s, e], (e, 0, Ed.size - 1)) / sp.sqrt(Ed.size), (Bd, Hd, Td, Td)),
        output("lse", (b, h, t), sp.log(sp.Sum(keep(t, u) * sp.exp(score[b, h, t, u]), (u, 0, Td.size - 1))), (Bd, Hd, Td)),
        output("p", (b, h, t, s), keep(t, s) * sp.exp(score[b, h, t, s] - lse[b, h, t]), (Bd, Hd, Td, Td)),
    ),
    outputs=(output("O", (b, h, t, e), sp.Sum(p[b, h, t, s] * V[b, h, s, e], (s, 0, Td.size - 1)), (Bd, Hd, Td, Ed)),),
    test_sizes=({"B": 1, "H": 1, "T": 1, "E": 1}, {"B": 1, "H": 2, "T": 3, "E": 2}, {"B": 2, "H": 1, "T": 5, "E": 3}),
    tolerances={"float32": (1e-5, 1e-6), "bfloat16": (2e-2, 2e-2)},
))
