"""What a stencil (convolution) launch of the implicit GEMM specializes on, read from the plan.

A stencil's window (the summed indices a filter reads plainly and the other operand reads inside a
position expression: conv2d's ``r``, ``s`` in ``X[n, c, h*stride + r - pad, ...] * Wt[o, c, r, s]``)
is small and fixed per layer, as are the integer params in its index arithmetic (stride, padding).
Their sizes become compile-time constants in every stencil launch of the op, forward and backward,
so the decomposition of a flattened K (or N) index into the window is a division by a constant.
Found from index structure, so a user's own stencil op gets the same kernels as ``conv2d``.
"""
from __future__ import annotations

import sympy as sp

from ..functions import Iverson
from ..plan import KernelClass, KernelPlan, Statement, dim_of_extent
from .triton_kernels import _formula_lines


def window_dims(plan: KernelPlan, dims) -> set[str]:
    """Dims of the forward stencils' windows: a summed index some factor reads as a plain index
    and another inside a position (never the channels ``c``, read plainly by both)."""
    out = set()
    for st in plan.forward.statements:
        if st.kind is not KernelClass.STENCIL:
            continue
        for S in st.expr.atoms(sp.Sum):
            tensors = [f for f in sp.Mul.make_args(S.function) if isinstance(f, sp.Indexed)]
            for k, _lo, hi in S.limits:
                plain = any(k in t.indices for t in tensors)
                inside = any(k in e.free_symbols and e != k for t in tensors for e in t.indices)
                d = dim_of_extent(hi + 1, dims)
                if plain and inside and d is not None:
                    out.add(d.name)
    return out


def index_params(st: Statement, params) -> set[str]:
    """Integer params that a statement's positions or guards read."""
    where = set()
    for t in st.expr.atoms(sp.Indexed):
        for e in t.indices:
            where |= e.free_symbols
    for g in st.expr.atoms(Iverson):
        where |= g.free_symbols
    return {p.name for p in params if p.integer and p.symbol in where}


def emit_stencil(ctx, st: Statement, kname: str, sig, g: dict):
    """The stencil variant of :func:`symgrad.targets.triton_gemm.emit_gemm`'s kernel and host code
    (``g`` holds the pieces that function built: index splits, decompositions, tile loads, store).

    The window dims and index params are constexpr, index math is int32 where the host finds it
    fits, and a launch whose result is the plain sum (no epilogue, no batch axis: a filter
    gradient) splits K across programs when its tiles alone would leave SMs idle."""
    for d in sorted(window_dims(ctx.plan, tuple(ctx.dims.values())) & sig.idims):
        sig.idims.discard(d)
        sig.constexpr.append((f"n_{d}", f"n_{d}"))
    for p in sorted(index_params(st, ctx.params.values()) & sig.params):
        sig.params.discard(p)
        sig.constexpr.append((f"p_{p}", f"p_{p}"))
    split = g["plain_sum"] and not g["batch"]
    sig.extra += [("WS_ptr", "t_ws"), ("M_tot", "M_tot"), ("N_tot", "N_tot"), ("K_tot", "K_tot"), ("K_split", "K_split")]
    tensors = ", ".join(f"t_{b}" for b in sorted(set(g["tensors"]) | {st.target}))
    sig.constexpr += [("GROUP_M", "8"), ("DOT_F32", "_rt.dot_f32(dtype)"), ("PREC", "_rt.dot_precision(dtype)"),
                      ("SPLIT", "splits > 1"), ("IDX64", f"_rt.wide_index(M_tot, N_tot, K_tot, t_ws, {tensors})")]
    tuned = [f"{b}: tl.constexpr" for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K")]
    src = ctx.env.get_template("stencil.j2").render(
        name=kname, args=sig.kernel_args() + tuned, acc=sig.acc_lines(), formulas=_formula_lines([st]),
        shape=f"M = ({', '.join(map(str, g['m_idx']))}), N = ({', '.join(map(str, g['n_idx']))}), K = ({', '.join(map(str, g['kvars']))})"
        + (f", batch = ({', '.join(map(str, g['batch']))})" if g["batch"] else ""),
        batch_decomp=g["batch_decomp"], decomp=g["decomp"], k_decomp=g["k_decomp"], a_lines=g["a_lines"],
        b_lines=g["b_lines"], ep_loads=g["ep_loads"], store=g["store"],
    )
    batches = f" * {' * '.join(g['b_ext'])}" if g["batch"] else ""
    host = [
        f"M_tot = {' * '.join(g['m_ext'])}",
        f"N_tot = {' * '.join(g['n_ext'])}",
        f"K_tot = {' * '.join(g['k_ext'])}",
        ("splits, K_split = _rt.split_k(M_tot, N_tot, K_tot, device)" if split else "splits, K_split = 1, K_tot"),
        f"t_ws = _rt.split_workspace(splits, M_tot, N_tot, device, dtype) if splits > 1 else t_{st.target}",
        "grid = lambda meta: (triton.cdiv(M_tot, meta['BLOCK_M']) * triton.cdiv(N_tot, meta['BLOCK_N'])" + batches + ", splits)",
        # K_tot = 0 still launches: the output is the epilogue of a zero sum, as torch gives it
        f"if _rt.programs((M_tot * N_tot{batches},)): {sig.launcher(kname)}[grid]({', '.join(sig.host_args())})",
    ]
    if split:
        order = list(g["m_idx"]) + list(g["n_idx"])
        perm = tuple(order.index(ix) for ix in st.indices)
        shape = ", ".join(g["m_ext"] + g["n_ext"]) + ","
        host.append(f"if splits > 1: _rt.finish_split(t_ws, t_{st.target}, ({shape}), {perm})")
    return [src], host, [st.target]
