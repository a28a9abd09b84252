"""What the rewrite rules may know about an op: index ranges, tensor extents, facts, patterns."""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp


@dataclass(frozen=True)
class Pattern:
    """A forward quantity ``name[indices] = expr`` that a gradient may be rewritten to reuse."""

    name: str
    indices: tuple[sp.Symbol, ...]
    expr: sp.Expr  # with canonical dummy names
    wrap: str = ""  # "exp": the pattern is exp of the value (a log-softmax output's softmax)

    def at(self, values) -> sp.Expr:
        v = sp.Symbol(self.name, real=True) if not self.indices else sp.IndexedBase(self.name, real=True)[tuple(values)]
        return sp.exp(v) if self.wrap == "exp" else v


@dataclass
class Context:
    op: str
    ranges: dict[sp.Symbol, tuple[sp.Expr, sp.Expr]] = field(default_factory=dict)  # free index -> (lo, hi)
    extents: dict[str, tuple[sp.Expr, ...]] = field(default_factory=dict)  # tensor -> size per dim
    label_ranges: dict[str, sp.Expr] = field(default_factory=dict)  # label tensor -> class count
    patterns: list[Pattern] = field(default_factory=list)
    reserved: set[str] = field(default_factory=set)  # names dummies must not take (tensors, dims, params)
    letters: dict[sp.Expr, str] = field(default_factory=dict)  # dim extent -> preferred dummy name
    # a forward pattern instantiated at an index substitution, canonicalized: the rules try the same
    # few instances on every node of every pass, and canonicalizing one is most of a derivation's time
    instances: dict = field(default_factory=dict)
