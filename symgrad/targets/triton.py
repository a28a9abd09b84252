"""The Triton target: ``render(program, command) -> str``, the source of ``generated/triton/<op>.py``.

The module it writes takes and returns torch tensors (CUDA, or CPU under ``TRITON_INTERPRET=1``):

- ``OP, INPUTS, DIFFERENTIABLE, OUTPUTS, PARAMS`` (and ``SAVED``: what backward reads;
  ``BACKWARD_ONCE`` where backward hands out a saved buffer it scaled in place, a fused loss's
  gradient: one backward per forward, and ``forward_with_saved``/``apply`` take ``inplace``);
- ``forward(*inputs, **params)``, ``forward_with_saved(...) -> (outputs, saved)``,
  ``backward(saved, *cotangents)`` (one gradient per input, ``None`` where there is none),
  ``vjp(*inputs, *cotangents, **params)``;
- ``Function`` (a ``torch.autograd.Function``) and ``apply(*inputs, **params)``; forward and
  backward are ``torch.library`` custom ops with fake (meta) implementations and
  ``register_autograd``, so ``torch.compile(fullgraph=True)`` traces a model that uses them;
- where the plan has a multi-tensor form (``KernelPlan.multi``: a map, or a self-combining
  reduction), ``MULTI`` and ``forward_multi(*lists, ...)``: ``forward`` of many tensors at once
  (:mod:`.triton_multi`, which also prints update rules' whole modules).

Layout follows Liger-Kernel: forward kernel(s), backward kernel(s), host wrappers, autograd.
Lowering is planned once in :mod:`symgrad.plan` and emitted per kernel class by ``triton_kernels``
(MAP, ROW_REDUCTION) and ``triton_gemm`` (CONTRACTION, STENCIL); see those modules.
"""
from __future__ import annotations

import functools

import jinja2
import sympy as sp

from ..declare import Role
from ..plan import KernelPlan, LoweringError
from .triton_expr import HELPERS, print_expr
from . import triton_multi
from .triton_gemm import emit_gemm
from .triton_kernels import Context, emit_map, emit_rows, emit_scale

__all__ = ["render", "LoweringError", "TEMPLATES"]

from . import template_dir  # noqa: E402  (one template lookup, checkout or wheel)

TEMPLATES = template_dir("triton")
NAMESPACE = "symgrad_triton"


@functools.lru_cache(maxsize=None)
def _env() -> jinja2.Environment:
    # One environment for the process: Jinja compiles each template once per environment.
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


_EMIT = {"map": emit_map, "rows": emit_rows, "gemm": emit_gemm, "scale": emit_scale}


def _declared_in(op) -> str:
    from . import declaration_file  # the target table's helper, shared with the NumPy target

    return declaration_file(op)


def _host_dim_formula(expr: sp.Expr, dims, params) -> str:
    names = {d.symbol: f"n_{d.name}" for d in dims}
    names.update({p.symbol: f"p_{p.name}" for p in params})
    return print_expr(expr, names, index_mode=True)


def _skip_empty(line: str) -> str:
    """A kernel launch ``k[grid](...)`` runs only when its grid has programs: an empty batch
    launches nothing (Triton refuses a grid of 0), and its outputs are empty already."""
    head, sep, _ = line.partition("](")
    name, bracket, grid = head.partition("[")
    kernel = name.isidentifier() or name.startswith("_rt.float_params(")
    if not sep or not bracket or not kernel or grid.strip("(),").isdigit():
        return line
    return f"if _rt.programs({grid}): {line}"


def render(plan: KernelPlan, command: str | None = None) -> str:
    """The generated module for ``program``; raises :class:`LoweringError` (a NotImplementedError)
    naming the op, statement and kernel class when a statement cannot be lowered yet."""
    op = plan.op
    command = command or f"symgrad generate {op.name} --target triton"
    env = _env()
    if op.kind == "update":
        return triton_multi.render(plan, command, env)
    ctx = Context(plan, env)
    kernels = {"forward": [], "backward": []}
    host = {"forward": [], "backward": []}
    for side in ("forward", "backward"):
        for n, launch in enumerate(getattr(plan, side).launches):
            kname = f"_{side[:3]}{n}_{launch.kind}"
            srcs, lines, targets = _EMIT[launch.kind](ctx, launch, kname)
            kernels[side] += srcs
            host[side].append((kname, launch, lines, targets))

    dims = [ds.dim for ds in plan.dims]
    params = list(plan.params)
    inputs = [op.tensor(n) for n in plan.inputs]
    float_inputs = [t for t in inputs if t.role is not Role.LABEL]
    dtype_src = float_inputs[0].name
    outputs = list(plan.outputs)
    out_dims = {o: plan.buffers[o] for o in outputs}
    grads = [f"d{t}" for t in plan.differentiable]
    extra_saved = [n for n in plan.saved_values if n not in outputs]
    saved_all = list(plan.saved_inputs) + list(plan.saved_values)
    # Gradients backward hands out as the saved buffer it scaled in place (fused losses): the
    # backward custom op mutates that buffer and returns only the other gradients.
    scaled = {g: saved_all.index(plan.fused[g]) for g in grads if any(launch.kind == "scale" and g in launch.targets for launch in plan.backward.launches)}
    overwritable = {inp: g for g, inp in plan.overwritable.items()}

    def shape(name):
        ds = plan.buffers[name]
        return "(" + "".join(f"n_{d.name}, " for d in ds) + ")"

    def alloc_dtype(name):
        if name in outputs or name in plan.fused.values() or name in grads:
            return "dtype"
        return "_rt.acc_dtype(dtype)"  # intermediates: float32, float64 for float64 tensors

    dim_lines = []
    for ds in plan.dims:
        if ds.buffer is None:
            dim_lines.append(f"n_{ds.dim.name} = {_host_dim_formula(ds.formula, dims, params)}")
        else:
            dim_lines.append(f"n_{ds.dim.name} = dims[{ds.dim.name!r}]")

    def launch_block(side: str, skip_fused: bool) -> list[str]:
        lines = []
        have = set(plan.inputs) if side == "forward" else set(saved_all) | set(plan.cotangents)
        for kname, launch, klines, targets in host[side]:
            lines.append(f"# {kname}: {', '.join(targets)} ({launch.kind})")
            for t in targets:
                if t in have or launch.kind == "scale":  # a scale launch hands out the buffer it scales
                    continue
                if t in plan.fused.values():
                    into = next((f"t_{inp} if inplace else " for g, inp in plan.overwritable.items() if plan.fused[g] == t), "")
                    lines.append(f"t_{t} = {into}torch.empty({shape(t)}, dtype=dtype, device=device) if write_grad else torch.empty({'(1,) * ' + str(len(plan.buffers[t]))}, dtype=dtype, device=device)")
                else:
                    lines.append(f"t_{t} = torch.empty({shape(t)}, dtype={alloc_dtype(t)}, device=device)")
                have.add(t)
            lines += [_skip_empty(line) for line in klines]
        return lines

    labels = {t.name for t in inputs if t.role is Role.LABEL}
    constants = [t.name for t in inputs if t.role is Role.CONST]
    fused_any = bool(plan.fused)
    gemm_reads = set()
    for _, launch, _, _ in host["backward"]:
        if launch.kind == "gemm":
            gemm_reads |= launch.statements[0].reads()

    # Inputs whose first dim takes any number of leading axes (torch's [*, D]), and the outputs
    # that start with that dim: folded in, computed, unfolded.
    leading = list(plan.leading_inputs)
    ranks = {t.name: len(t.dims) for t in inputs}
    leading_outputs = set(plan.leading_outputs)

    def apply_return(n_ret: int) -> str:
        items = ["res"] if n_ret == 1 else [f"res[{k}]" for k in range(len(outputs))]
        items = [f"_rt.unfold({r}, _lead)" if o in leading_outputs else r for r, o in zip(items, outputs)]
        return items[0] if len(items) == 1 else "(" + ", ".join(items) + ")"

    comments = {
        "forward": [s.formula for s in plan.forward.statements if not s.fused],
        "backward": [s.formula for s in plan.backward.statements],
    }
    return env.get_template("module.j2").render(
        op=op, declared=_declared_in(op), command=command, namespace=NAMESPACE,
        helpers=sorted(HELPERS), inputs=inputs, labels=labels, dims=dims, params=params,
        outputs=outputs, out_dims=out_dims, grads=grads, differentiable=list(plan.differentiable),
        cotangents=list(plan.cotangents), saved_inputs=list(plan.saved_inputs),
        saved_values=list(plan.saved_values), extra_saved=extra_saved, saved_all=saved_all,
        fused=plan.fused, fused_any=fused_any, dtype_src=dtype_src,
        forward_kernels=kernels["forward"], backward_kernels=kernels["backward"],
        forward_launches=launch_block("forward", False), backward_launches=launch_block("backward", False),
        dim_lines=dim_lines, shape=shape, alloc_dtype=alloc_dtype, gemm_reads=gemm_reads,
        comments=comments, fused_cotangent=plan.fused_cotangent, repr=repr,
        kinds=sorted({s.kind.name for s in plan.forward.statements + plan.backward.statements}),
        plan=plan, str=str, len=len, float=float, zip=zip, range=range,
        leading=leading, ranks=ranks, leading_outputs=leading_outputs, apply_return=apply_return,
        least_sizes={d.name: d.least for d in dims if d.min_size},
        # labels in range, as torch checks them (symgrad.runtime.triton_support.check_labels)
        label_checks=[f"_rt.check_labels(OP, {f.label!r}, t_{f.label}, n_{f.dim.name}, {'p_' + f.ignore if f.ignore else 'None'})"
                      for f in op.facts],
        constants=constants, scaled=scaled, scaled_names=tuple(scaled), returned=[g for g in grads if g not in scaled], overwritable=overwritable,
        multi_section=triton_multi.section(plan, env),
    )
