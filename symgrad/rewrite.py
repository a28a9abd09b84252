"""Named rewrite rules, grouped into ordered stages, run to a fixed point with a trace.

A rule is a small function ``(node, ctx) -> new node | None`` applied at every node of an
expression, bottom-up. A stage is an ordered list of rules run until nothing fires (bounded by a
pass limit and a size guard, so a rule that grows the expression cannot run away). Every firing
is recorded, which is what ``symgrad derive --steps`` prints.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import sympy as sp

RuleFn = Callable[[sp.Basic, "object"], "sp.Basic | None"]


class RewriteError(RuntimeError):
    """A stage did not settle, or a rule produced something it must not."""


@dataclass(frozen=True)
class Rule:
    name: str
    doc: str
    fn: RuleFn
    quiet: bool = False  # bookkeeping (renaming dummies) that --steps does not show
    top_down: bool = False  # try the largest node first (pattern matching wants whole forms)


@dataclass(frozen=True)
class Stage:
    name: str
    rules: tuple[Rule, ...]
    max_passes: int = 25


@dataclass
class Step:
    stage: str
    rule: str
    doc: str
    before: sp.Basic
    after: sp.Basic
    quiet: bool = False


@dataclass
class Trace:
    steps: list[Step] = field(default_factory=list)


def rule(name: str, doc: str, quiet: bool = False, top_down: bool = False) -> Callable[[RuleFn], Rule]:
    def wrap(fn: RuleFn) -> Rule:
        return Rule(name, doc, fn, quiet, top_down)

    return wrap


def apply_bottom_up(expr: sp.Basic, fn: Callable[[sp.Basic], "sp.Basic | None"]) -> sp.Basic:
    """Rewrite children first, then the node; atoms and Indexed entries are left alone."""
    if expr.is_Atom or isinstance(expr, (sp.Indexed, sp.IndexedBase)):
        return expr
    args = expr.args
    new_args = tuple(apply_bottom_up(a, fn) if isinstance(a, sp.Basic) else a for a in args)
    node = expr.func(*new_args) if new_args != args else expr
    out = fn(node)
    return node if out is None else out


def apply_top_down(expr: sp.Basic, fn: Callable[[sp.Basic], "sp.Basic | None"]) -> sp.Basic:
    """Rewrite the node first; where nothing fires, descend into the children."""
    if expr.is_Atom or isinstance(expr, (sp.Indexed, sp.IndexedBase)):
        return expr
    out = fn(expr)
    if out is not None:
        return out
    args = expr.args
    new_args = tuple(apply_top_down(a, fn) if isinstance(a, sp.Basic) else a for a in args)
    return expr.func(*new_args) if new_args != args else expr


def size(expr: sp.Basic) -> int:
    return sp.count_ops(expr, visual=False) + 1


def run_stage(expr: sp.Basic, stage: Stage, ctx, trace: Trace | None, size_limit: int = 20000) -> sp.Basic:
    for _ in range(stage.max_passes):
        changed = False
        for r in stage.rules:
            walk = apply_top_down if r.top_down else apply_bottom_up
            new = walk(expr, lambda node, r=r: r.fn(node, ctx))
            if new != expr:
                if trace is not None:
                    trace.steps.append(Step(stage.name, r.name, r.doc, expr, new, r.quiet))
                if size(new) > size_limit:
                    raise RewriteError(f"rule {r.name} grew the expression past {size_limit} operations")
                expr = new
                changed = True
        if not changed:
            return expr
    raise RewriteError(f"stage {stage.name} did not settle in {stage.max_passes} passes")


def run_stages(expr: sp.Basic, stages: Sequence[Stage], ctx, trace: Trace | None) -> sp.Basic:
    for stage in stages:
        expr = run_stage(expr, stage, ctx, trace)
    return expr
