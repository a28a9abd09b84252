"""Kernel emitter for CONTRACTION and STENCIL statements: a tiled implicit GEMM with ``tl.dot``.

``target[...] = epilogue(Sum(A[...] * B[...], K...))``: the target's indices split into the M side
(those the operand holding the first target index reads) and the N side (the other operand's);
the summed indices are K. Each side is flattened and decomposed back into its indices inside the
kernel, and every operand entry is addressed through its own strides, so transposes (dX = dY Wᵀ,
dW = Xᵀ dY) are strides, and a convolution's ``X[n, c, h*stride + r - pad, ...]`` is an
address computed per tile entry, out-of-range entries masked to zero (the padding).

A gradient of a strided convolution arrives re-indexed by the plan (:func:`symgrad.plan.reindex_stencils`):
summed over the filter position ``v``, reading ``dY`` at ``floor((h + pad - v)/stride)`` under the
guard ``[Mod(h + pad - v, stride) == 0]``: a transposed convolution as an implicit GEMM over
(Cout, R, S). Guards become masks of the tile that reads their indices.

Accumulation is fp32 (fp64 for float64 tensors: ``ACC``); the epilogue (bias add, scaling) is
applied to the accumulated tile before the store in the output dtype.
"""
from __future__ import annotations

import sympy as sp

from ..functions import Iverson
from .triton_expr import TritonPrintError, print_expr
from .triton_kernels import Context, Sig, _formula_lines, pr, store_value
from ..plan import KernelClass, Launch, LoweringError, dim_of_extent
from .triton_stencil import emit_stencil

ACC = sp.Symbol("_acc", real=True)


def emit_gemm(ctx: Context, launch: Launch, kname: str):
    (st,) = launch.statements
    op = ctx.op
    where = f"op {op.name}: {st.kind.name} statement {st.formula}"
    sums = list(st.expr.atoms(sp.Sum))
    if len(sums) != 1:
        raise LoweringError(f"{where}: expected one sum, found {len(sums)}")
    (S,) = sums
    dims = tuple(ctx.dims.values())
    kvars, kext = [], {}
    for k, lo, hi in S.limits:
        if lo != 0:
            raise LoweringError(f"{where}: sum over {k} does not start at 0")
        kvars.append(k)
        kext[k] = hi + 1
    factors = sp.Mul.make_args(S.function)
    tensors = [f for f in factors if isinstance(f, sp.Indexed)]
    # Iverson guards over the summed indices (a re-indexed stencil's divisibility and range) mask
    # the tile of the operand whose indices they read; everything else is the epilogue's scale.
    guards = [f for f in factors if isinstance(f, Iverson) and f.free_symbols & set(kvars)]
    coeff = sp.Mul(*[f for f in factors if not isinstance(f, sp.Indexed) and f not in guards])
    if len(tensors) != 2 or coeff.free_symbols & set(kvars):
        raise LoweringError(f"{where}: the summand is not a product of two tensors")
    epilogue = st.expr.xreplace({S: coeff * ACC})
    if epilogue.atoms(sp.Sum):
        raise LoweringError(f"{where}: the epilogue holds another sum")
    free = list(st.indices)
    ops = [list(t.indices) for t in tensors]
    bufs = [str(t.base) for t in tensors]

    def syms(o):
        return set().union(*(e.free_symbols for e in ops[o]))

    # Free indices both operands read are batch indices (batched matmul): one (M, N) product per
    # batch coordinate, the flattened batch folded into the launch grid.
    batch = [ix for ix in free if ix in syms(0) and ix in syms(1)]
    own = [ix for ix in free if ix not in batch]
    a_op = 0 if own and own[0] in syms(0) else 1
    b_op = 1 - a_op
    m_idx = [ix for ix in own if ix in syms(a_op)]
    n_idx = [ix for ix in own if ix in syms(b_op)]
    if set(m_idx) & set(n_idx) or set(m_idx) | set(n_idx) != set(own) or not m_idx or not n_idx:
        raise LoweringError(f"{where}: the target indices do not split into the two operands' own indices")
    guard_of = {0: [], 1: []}
    for g in guards:
        side = g.free_symbols - set(kvars) - {p.symbol for p in ctx.params.values()} - {d.symbol for d in dims}
        o = a_op if side <= set(m_idx) else b_op
        if not side <= set(m_idx if o == a_op else n_idx):
            raise LoweringError(f"{where}: guard {g} reads both operands' indices")
        guard_of[o].append(g.args[0])

    sig = Sig(ctx)
    fdims = dict(zip(free, st.dims))

    def ext_code(extent) -> str:
        dd = dim_of_extent(extent, dims)
        if dd is None:
            raise LoweringError(f"{where}: extent {extent} is no dim")
        return sig.idim(dd.name)

    decomp = []

    def decompose(var: str, idxs: list, extents: list, prefix: str):
        names = {}
        rem = var
        for pos in range(len(idxs) - 1, 0, -1):
            n = extents[pos]
            names[idxs[pos]] = f"{prefix}_{idxs[pos]}"
            decomp.append(f"{prefix}_{idxs[pos]} = {rem} % {n}")
            decomp.append(f"{prefix}r{pos} = {rem} // {n}")
            rem = f"{prefix}r{pos}"
        names[idxs[0]] = f"{prefix}_{idxs[0]}"
        decomp.append(f"{prefix}_{idxs[0]} = {rem}")
        return names

    m_ext = [ext_code(fdims[ix].size) for ix in m_idx]
    n_ext = [ext_code(fdims[ix].size) for ix in n_idx]
    k_ext = [ext_code(kext[k]) for k in kvars]
    mnames = decompose("offs_m", m_idx, m_ext, "m")
    nnames = decompose("offs_n", n_idx, n_ext, "n")
    top_decomp, decomp = decomp, []
    b_ext = [ext_code(fdims[ix].size) for ix in batch]
    bnames = decompose("pid_b", batch, b_ext, "bt") if batch else {}
    batch_decomp, decomp = decomp, []
    knames = decompose("offs_k", kvars, k_ext, "k")
    k_decomp = decomp

    def index_names(row_syms: dict, col_syms: dict) -> dict:
        names = {s: f"{v}[:, None]" for s, v in row_syms.items()}
        names.update({s: f"{v}[None, :]" for s, v in col_syms.items()})
        names.update(bnames)
        for p in ctx.params.values():
            names[p.symbol] = f"p_{p.name}"
            sig.params.add(p.name)
        for dd in dims:
            names[dd.symbol] = f"n_{dd.name}"
        return names

    def iprint(expr, names):
        for dd in dims:
            if dd.symbol in expr.free_symbols:
                sig.idim(dd.name)
        try:
            return print_expr(expr, names, index_mode=True)
        except TritonPrintError as e:
            raise LoweringError(f"{where}: index {expr}: {e}") from None

    def condition(cond, names) -> str:
        """A guard in index arithmetic: ``Eq(Mod(a, b), 0)`` is ``a % b == 0`` (with the C rules
        of the GPU, where a negative ``a`` gives a non-positive remainder: still 0 exactly when
        ``b`` divides ``a``, so the masked set is the same as Python's)."""
        if isinstance(cond, sp.And):
            return " & ".join(condition(c, names) for c in cond.args)
        if isinstance(cond, sp.Eq) and isinstance(cond.lhs, sp.Mod) and cond.rhs == 0:
            a, b = cond.lhs.args
            return f"((({iprint(a, names)}) % ({iprint(b, names)})) == 0)"
        if isinstance(cond, (sp.Le, sp.Lt, sp.Ge, sp.Gt, sp.Eq)):
            op_ = {sp.Le: "<=", sp.Lt: "<", sp.Ge: ">=", sp.Gt: ">", sp.Eq: "=="}[type(cond)]
            return f"(({iprint(cond.lhs, names)}) {op_} ({iprint(cond.rhs, names)}))"
        raise LoweringError(f"{where}: guard {cond} has no index-arithmetic form")

    def tile(o: int, row_syms: dict, col_syms: dict, base_mask: str) -> tuple[str, list[str]]:
        """The operand's element offsets in its buffer, and the masks of its tile."""
        names = index_names(row_syms, col_syms)
        masks = [base_mask] + [condition(c, names) for c in guard_of[o]]
        name = bufs[o]
        offs = []
        plain = set(row_syms) | set(col_syms) | set(bnames)
        for a, e in enumerate(ops[o]):
            code = iprint(e, names)
            offs.append(f"({code}) * {sig.stride(name, a)}")
            axis_dim = ctx.plan.buffers[name][a]
            same = e in plain and (fdims.get(e) == axis_dim or (e in kext and dim_of_extent(kext[e], dims) == axis_dim))
            if not same:
                masks.append(f"(({code}) >= 0) & (({code}) < {sig.idim(axis_dim.name)})")
        return " + ".join(offs) or "0", masks

    def load(o: int, offs: str, masks: list[str], var: str) -> list[str]:
        mask = " & ".join(masks)
        lines = []
        if st.kind is KernelClass.STENCIL:  # the mask is named: the stencil's exact re-sum reads it (stencil.j2)
            lines.append(f"{var}_in = {mask}")
            mask = f"{var}_in"
        return lines + [f"{var} = tl.load({sig.buf(bufs[o])} + {offs}, mask={mask}, other=0.0)"]

    def k_step(o: int) -> str | None:
        """With one summed index that the operand reads only as a plain index (a matmul's K),
        its offsets move by a fixed step per K tile: ``BLOCK_K`` times the strides of the axes
        that index addresses. None otherwise (a flattened K, or K inside an index expression)."""
        if len(kvars) != 1:
            return None
        (k,) = kvars
        axes = [a for a, e in enumerate(ops[o]) if e == k]
        if any(k in e.free_symbols for e in ops[o] if e != k):
            return None
        strides = [sig.stride(bufs[o], a) for a in axes]
        return f"BLOCK_K * ({' + '.join(strides)})" if strides else "0"

    k_init, k_next = [], []
    if st.kind is KernelClass.STENCIL:
        a_lines = load(a_op, *tile(a_op, mnames, knames, "m_mask[:, None] & k_mask[None, :]"), "a")
        b_lines = load(b_op, *tile(b_op, knames, nnames, "k_mask[:, None] & n_mask[None, :]"), "b")
    else:
        # gemm.j2 wraps the M and N offsets into range: only K is masked. Where K is one plain
        # index, each operand's offsets are computed once, in int32 unless IDX64, and carried
        # through the K loop, moved by one step per tile: recomputed per tile, the compiler
        # hoists a 64-bit address per tile entry out of the loop instead (two registers each:
        # the larger tiles spilled inside the loop where operand rows are not 16-byte aligned).
        a_tile = tile(a_op, mnames, knames, "k_mask[None, :]")
        b_tile = tile(b_op, knames, nnames, "k_mask[:, None]")
        steps = (k_step(a_op), k_step(b_op))
        if None in steps or len(a_tile[1]) + len(b_tile[1]) > 2:
            a_lines, b_lines = load(a_op, *a_tile, "a"), load(b_op, *b_tile, "b")
        else:
            k_init = k_decomp + [f"a_off = {a_tile[0]}", f"b_off = {b_tile[0]}"]
            k_decomp = []
            a_lines, b_lines = load(a_op, "a_off", a_tile[1], "a"), load(b_op, "b_off", b_tile[1], "b")
            k_next = [f"a_off += {steps[0]}", f"b_off += {steps[1]}"]

    # Epilogue and store.
    names = {ACC: "acc", **bnames}
    names.update({s: f"{v}[:, None]" for s, v in mnames.items()})
    names.update({s: f"{v}[None, :]" for s, v in nnames.items()})
    ep_loads = []
    for n_, node in enumerate(sorted(epilogue.atoms(sp.Indexed), key=sp.default_sort_key)):
        nb = str(node.base)
        offs = []
        for a, ix in enumerate(node.indices):
            if ix not in names:
                raise LoweringError(f"{where}: epilogue reads {node}")
            offs.append(f"{names[ix]} * {sig.stride(nb, a)}")
        ep_loads.append(f"e{n_} = tl.load({sig.buf(nb)} + {' + '.join(offs) or '0'}, mask=mn_mask, other=0.0).to(ACC)")
        names[node] = f"e{n_}"
    names = sig.names_for(epilogue, names)
    value = pr(ctx, epilogue, names, st.formula)
    tptr = sig.buf(st.target)
    toffs = " + ".join(f"{names[ix]} * {sig.stride(st.target, a)}" for a, ix in enumerate(st.indices))
    store = f"tl.store({tptr} + {toffs}, {store_value(tptr, value)}, mask=mn_mask)"

    if st.kind is KernelClass.STENCIL:
        return emit_stencil(ctx, st, kname, sig, dict(
            m_idx=m_idx, n_idx=n_idx, kvars=kvars, batch=batch, m_ext=m_ext, n_ext=n_ext, k_ext=k_ext, b_ext=b_ext,
            batch_decomp=batch_decomp, decomp=top_decomp, k_decomp=k_decomp, a_lines=a_lines, b_lines=b_lines,
            ep_loads=ep_loads, store=store, plain_sum=epilogue == ACC, tensors=bufs))
    sig.extra += [("M_tot", "M_tot"), ("N_tot", "N_tot"), ("K_tot", "K_tot")]
    sig.constexpr += [("GROUP_M", "8"), ("DOT_F32", "_rt.dot_f32(dtype)"), ("PREC", "_rt.dot_precision(dtype)")]
    tensors = ", ".join(f"t_{b}" for b in sorted(sig.bufs))
    sig.constexpr.append(("IDX64", f"_rt.wide_index(M_tot, N_tot, K_tot, {tensors}, overhang=_rt.GEMM_OVERHANG)"))
    # Tiles, warps and stages are the autotuner's (keyed on the problem's shape and precision); the
    # host passes everything else.
    tuned = [f"{b}: tl.constexpr" for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K")]
    src = ctx.env.get_template("gemm.j2").render(
        name=kname, args=sig.kernel_args() + tuned, acc=sig.acc_lines(), formulas=_formula_lines([st]),
        shape=f"M = ({', '.join(map(str, m_idx))}), N = ({', '.join(map(str, n_idx))}), K = ({', '.join(map(str, kvars))})"
        + (f", batch = ({', '.join(map(str, batch))})" if batch else ""),
        batch_decomp=batch_decomp, decomp=top_decomp, k_init=k_init, k_decomp=k_decomp, k_next=k_next,
        a_lines=a_lines, b_lines=b_lines, ep_loads=ep_loads, store=store,
    )
    batches = f" * {' * '.join(b_ext)}" if batch else ""
    host = [
        f"M_tot = {' * '.join(m_ext)}",
        f"N_tot = {' * '.join(n_ext)}",
        f"K_tot = {' * '.join(k_ext)}",
        "grid = lambda meta: (triton.cdiv(M_tot, meta['BLOCK_M']) * triton.cdiv(N_tot, meta['BLOCK_N'])" + batches + ",)",
        # K_tot = 0 still launches: the output is the epilogue of a zero sum, as torch gives it
        f"if _rt.programs((M_tot * N_tot{batches},)): {sig.launcher(kname)}[grid]({', '.join(sig.host_args())})",
    ]
    return [src], host, [st.target]
