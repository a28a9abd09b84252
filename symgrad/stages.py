"""The simplification pipeline: named stages of named rules, in the order they run."""
from __future__ import annotations

from .rewrite import Stage
from .rules import canonical as c
from .rules import deltas as d
from .rules import reuse as r
from .rules import stabilize as s

_TIDY_SUMS = (c.rename_dummies, c.sum_split, c.sum_factor_out, c.sum_of_constant)

CANONICALIZE = Stage("canonicalize", (*_TIDY_SUMS, c.merge_powers, d.distribute_deltas))
ELIMINATE_DELTAS = Stage(
    "eliminate deltas",
    (d.eliminate_delta_addressed, d.eliminate_delta, d.guard_by_construction, d.distribute_deltas, *_TIDY_SUMS),
)
APPLY_FACTS = Stage("apply facts", (d.guard_by_label_fact, *_TIDY_SUMS))
REUSE_FORWARD = Stage("reuse forward", (c.sum_push_in, r.reuse_forward, r.factor_into_sum, c.rename_dummies))
# reuse_forward again: pulling a factor out of a sum can expose a forward value whole (Sum(weight) of a
# class-weighted, smoothed cross-entropy)
TIDY = Stage("tidy", (c.sum_factor_out, c.sum_of_constant, c.merge_powers, c.expand_when_smaller, c.collect_common, c.sum_nest, c.sum_join, c.rename_dummies, r.reuse_forward))
STABILIZE = Stage("stabilize", (s.logsumexp_shift, s.softmax_shift, s.exp_sum_shift, s.merge_exps, s.log_of_exp, s.softplus_rule, s.log_sigmoid, s.one_softplus, s.log1p_rule, s.expm1_rule, s.scaled_sum_of_squares))

GRADIENT_STAGES = (CANONICALIZE, ELIMINATE_DELTAS, APPLY_FACTS, REUSE_FORWARD, TIDY, STABILIZE)
FORWARD_STAGES = (CANONICALIZE, ELIMINATE_DELTAS, APPLY_FACTS, STABILIZE)
