"""Bytes a kernel plan moves to and from global memory, against the least a fused kernel must move.

Read from the :class:`~symgrad.plan.KernelPlan` alone (its launches, statements and buffers), never
from generated text, so it holds for any target that prints the plan. The host code's launch
choices enter only as two facts a caller passes per launch: whether a row kernel holds the whole
row in one block (then every pass over the row runs from registers) and how many programs are
resident on the GPU at once (then a re-read of a row is free when the rows in flight fit in L2).

Model, per launch:

- a buffer the launch reads is read once; one it writes (an output, a saved value, a gradient, or
  a value a later launch reads) is written once; values a launch computes and uses itself (a row
  max, a row sum) never reach memory;
- a row launch over a column axis makes one pass over the row per level of row reductions that
  depend on each other (layer norm's mean, then its variance, then the output: 3 passes; an online
  max-and-sum counts as one level with its max), plus one for a column-indexed result; each pass
  after the first re-reads the row operands, unless the row is one block, or what the resident
  programs keep hot fits in L2 (``L2_BYTES``) and the re-read hits there;
- a row launch with column partials (a norm's ``dw``, ``dbias``) leaves one fp32 partial row per
  program, written once and read once by the finishing kernel; with several blocks per row it
  also reads and writes that row once per row, in memory unless it hits L2 under the same condition:
  each resident program keeps hot its re-read row and its partial rows, and only if all of those
  fit in L2 at once is either free (otherwise both are charged);
- a contraction reads each operand once (its grouped tile order keeps re-reads in L2); its bound is
  compute, not bandwidth;
- a ``scale`` launch (a fused loss's gradient, scaled in place in the buffer forward wrote) reads
  only its cotangent at a cotangent of 1 (``loss.backward()``, and the benchmark's cotangent of a
  scalar loss), and leaves the buffer as it is; at any other cotangent it reads and writes it once;
- a multi-tensor launch (``KernelPlan.multi``, :func:`multi_bytes`) reads every tensor input once
  and writes each updated input (an update rule) or output (a map) once; a reduction writes one
  fp32 partial value per program instead, which its second stage reads.

The least a fused implementation must move: forward reads the inputs and writes the outputs;
backward reads the cotangents and the inputs it needs (or the saved values, when it needs no input)
and writes the gradients; forward+backward reads the inputs and cotangents once and writes the
outputs and gradients once. The predicted bound is that least over the modelled bytes: the
fraction of HBM bandwidth the kernels can reach at best.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import sympy as sp

from .plan import KernelPlan, Launch
from .primitives import ReduceMax

L2_BYTES = 50 * 10**6  # H100/H200 L2 (50 MB); A100 has 40 MB, the report says which it used
LABEL_BYTES = 8  # integer labels arrive as int64 (torch's default for class indices)

__all__ = ["L2_BYTES", "LaunchTraffic", "all_sizes", "launch_traffic", "minimum_bytes", "buffer_bytes", "row_passes",
           "multi_bytes", "multi_traffic"]


@dataclass(frozen=True)
class LaunchTraffic:
    reads: dict  # buffer -> bytes read (re-reads included)
    writes: dict  # buffer -> bytes written
    passes: int  # passes over a row (1 for maps and contractions)
    rereads_free: bool  # re-reads of a row hit L2 (or there are none)
    least: int  # each buffer the launch touches, read or written once

    @property
    def total(self) -> int:
        return sum(self.reads.values()) + sum(self.writes.values())


def all_sizes(plan: KernelPlan, sizes: dict, params: dict) -> dict:
    """``sizes`` completed with the dims the plan computes from others (a convolution's output
    height from the input's, the filter's, stride and padding)."""
    out = {k: int(v) for k, v in sizes.items() if k in {ds.dim.name for ds in plan.dims}}
    values = {p.symbol: params[p.name] for p in plan.params if p.name in params}
    for ds in plan.dims:
        if ds.formula is not None and ds.dim.name not in out:
            known = {d.dim.symbol: out[d.dim.name] for d in plan.dims if d.dim.name in out}
            out[ds.dim.name] = int(sp.floor(ds.formula.xreplace({**known, **values})))
    return out


def buffer_bytes(plan: KernelPlan, name: str, sizes: dict, itemsize: int) -> int:
    dims = plan.buffers[name]
    n = math.prod(int(sizes[d.name]) for d in dims) if dims else 1
    return n * (LABEL_BYTES if name in plan.labels else itemsize)


def _kernel_of(plan: KernelPlan, launch: Launch):
    for k in (plan.forward, plan.backward):
        if any(launch is l for l in k.launches):
            return k
    raise ValueError("launch is not in this plan")


def _written(plan: KernelPlan, launch: Launch) -> list:
    kernel = _kernel_of(plan, launch)
    later = set()
    for other in kernel.launches:
        if other is not launch:
            for st in other.statements:
                later |= st.reads()
    keep = set(plan.outputs) | set(plan.saved) | set(kernel.returns) | set(plan.fused.values()) | later
    return [st.target for st in launch.statements if st.target in keep]


def _read(plan: KernelPlan, launch: Launch) -> list:
    made = {st.target for st in launch.statements}
    names = set()
    for st in launch.statements:
        names |= st.reads()
    return sorted(n for n in names if n in plan.buffers and n not in made)


def row_passes(launch: Launch) -> int:
    """Passes over a row: one per level of dependent column reductions, plus one for a
    column-indexed result that needs them (1 for a launch without a column axis)."""
    if launch.kind != "rows" or launch.space[1] is None:
        return 1
    col = launch.space[1]
    by_target = {st.target: st for st in launch.statements}
    level: dict = {}

    def own_passes(st) -> int:
        # a sum or max along the column is one pass; a column-indexed result that reads it, another
        reduces = any(_bounds_column(r, col.symbol) for r in sp.preorder_traversal(st.expr))
        return int(reduces) + int(col in st.dims)

    def lvl(name) -> int:
        if name in level:
            return level[name]
        st = by_target[name]
        deps = [d for d in st.reads() if d in by_target]
        base = max((lvl(d) for d in deps), default=0)
        # a sum that reads only a row max runs in the max's pass (online max-and-sum)
        online = len(deps) == 1 and _is_max(by_target[deps[0]]) and col not in st.dims
        level[name] = base + (0 if online else own_passes(st))
        return level[name]

    return max((lvl(n) for n in by_target), default=1) or 1


def _is_max(st) -> bool:
    return isinstance(st.expr, ReduceMax)


def _bounds_column(node, size: sp.Symbol) -> bool:
    """Whether ``node`` reduces over the column: a sum or max whose range is the column's extent."""
    if isinstance(node, sp.Sum):
        return any(size in sp.sympify(hi).free_symbols for _, _, hi in node.limits)
    if isinstance(node, ReduceMax):
        return size in sp.sympify(node.args[3]).free_symbols
    return False


def launch_traffic(plan: KernelPlan, launch: Launch, sizes: dict, itemsize: int, *,
                   single_block: bool = False, resident_programs: int | None = None,
                   programs: int | None = None, l2_bytes: int = L2_BYTES) -> LaunchTraffic:
    """The bytes one launch moves at ``sizes`` (dim name -> size) for inputs of ``itemsize`` bytes.
    ``programs``: the launch's program count, each of which leaves one fp32 partial row per column
    partial for the finishing kernel (counted here, written once and read once, when given)."""
    if launch.kind == "scale":
        cot = {n: buffer_bytes(plan, n, sizes, itemsize) for n in _read(plan, launch) if n in plan.cotangents}
        return LaunchTraffic(cot, {}, 1, True, sum(cot.values()))
    reads = {n: buffer_bytes(plan, n, sizes, itemsize) for n in _read(plan, launch)}
    writes = {n: buffer_bytes(plan, n, sizes, itemsize) for n in _written(plan, launch)}
    least = sum(reads.values()) + sum(writes.values())
    passes = row_passes(launch)
    col = launch.space[1] if launch.kind == "rows" else None
    # column partials (dw[i], dbias[i]): each program leaves its fp32 partial row in memory (from
    # registers with a single block; added into once per row with several), the finish reads it
    partials = [st for st in launch.statements if col is not None and tuple(st.dims) == (col,)]
    rows_left = int(programs or 0) * (int(sizes[col.name]) * 4 * len(partials) if partials else 0)
    multi = col is not None and not single_block
    if not multi:
        partials = []
    row_ops = []
    if passes > 1 and multi:
        row_ops = [n for n in reads if col in plan.buffers[n] and len(plan.buffers[n]) > 1]
    free = True
    if row_ops or partials:
        # What each program keeps hot: the row its later passes read again and its partial rows.
        # Both stay in L2 only while every resident program's fit there at once; then neither
        # reaches memory again. Otherwise both are charged: each evicts the other.
        n_col = int(sizes[col.name])
        row_bytes = sum(n_col * (LABEL_BYTES if n in plan.labels else itemsize) for n in row_ops)
        hot = row_bytes + n_col * 4 * len(partials)
        in_flight = resident_programs if resident_programs is not None else 1
        free = in_flight * hot <= l2_bytes
        if not free:
            for n in row_ops:
                reads[n] *= passes
            if partials:
                # every row but each program's first reads the partial row back from memory, and
                # every row but its last writes it (the last write is the partial row left above)
                n_rows = math.prod(int(sizes[d.name]) for d in launch.space[0])
                rmw = max(n_rows - int(programs or 0), 0) * n_col * 4 * len(partials)
                reads["column partials"] = writes["column partials"] = rmw
    if rows_left:
        writes["partial rows"] = reads["partial rows (finish)"] = rows_left
    return LaunchTraffic(reads, writes, passes, free, least)


def minimum_bytes(plan: KernelPlan, sizes: dict, itemsize: int) -> dict:
    """The least bytes a fused implementation moves: ``forward``, ``backward``, ``both``."""
    b = lambda names: sum(buffer_bytes(plan, n, sizes, itemsize) for n in names)  # noqa: E731
    needs = plan.saved_inputs or tuple(n for n in plan.saved if n not in plan.fused.values()) or plan.saved
    grads = plan.backward.returns
    # a fused loss's forward wrote its gradients already: backward only needs the cotangent
    fused_only = bool(plan.fused) and all(g in plan.fused for g in grads)
    return {
        "forward": b(plan.inputs) + b(plan.outputs),
        "backward": b(plan.cotangents) if fused_only else b(plan.cotangents) + b(needs) + b(grads),
        "both": b(plan.inputs) + b(plan.outputs) + b(plan.cotangents) + b(grads),
    }



def multi_bytes(plan: KernelPlan, itemsize: dict) -> dict:
    """Bytes per entry that the plan's multi-tensor launch moves, and the least it can move:
    ``{"read", "written", "minimum_read", "minimum_written"}``. ``itemsize``: tensor -> bytes per
    entry (4 for fp32); an output not in it takes its op's first tensor input's. The launch reads
    every tensor input once and writes each updated input (an update rule) or output (a map) once;
    a reduction writes one fp32 value per program of many entries (0 per entry). The minimum reads
    what the statements read (an entry of a tensor they never read need not be loaded) and writes
    what the launch must."""
    launch = plan.multi
    if launch is None:
        raise ValueError(f"op {plan.op.name} has no multi-tensor launch")
    tensors = [t.name for t in plan.op.inputs if t.dims]
    needed = set().union(*(st.reads() for st in launch.statements)) & set(tensors)
    if plan.combine is not None:
        needed |= {str(e.base) for e in plan.combine.body.atoms(sp.Indexed)}
    if launch.kind == "multi_reduce":
        written = 0
    elif plan.updates:
        written = sum(itemsize[t] for t in plan.updates.values())
    else:
        written = sum(itemsize.get(st.target, itemsize[tensors[0]]) for st in launch.statements)
    return {"read": sum(itemsize[t] for t in tensors), "written": written,
            "minimum_read": sum(itemsize[t] for t in tensors if t in needed), "minimum_written": written}


def multi_traffic(plan: KernelPlan, entries: int, itemsize: int, programs: int = 0) -> LaunchTraffic:
    """The bytes of one multi-tensor launch over ``entries`` entries in all (every tensor input in
    ``itemsize`` bytes per entry): :func:`multi_bytes`, plus a reduction's fp32 partial values."""
    per = multi_bytes(plan, {t.name: itemsize for t in plan.op.inputs if t.dims})
    reads = {"tensors": per["read"] * entries}
    writes = {"tensors": per["written"] * entries}
    if plan.multi.kind == "multi_reduce":
        writes["partial values"] = 4 * int(programs)
    return LaunchTraffic(reads, writes, 1, True, (per["minimum_read"] + per["minimum_written"]) * entries)
